"""The tests' stand-in for the anti-spoofing part of Qubes R4.2+'s nftables base
(our own text, with the layout of CONTRACT section 1: tables ip/ip6 qubes, the
sets allowed and downstream, read by raw-priority rules for the vif group 2).
Loaded late by tests/netns/test_qubes_base_wait.py and installed as
/etc/qubes/qubes-antispoof.nft by the stand-in Qubes package of tests/system."""

ANTISPOOF_NFT = """\
#!/usr/sbin/nft -f
# test stand-in base: anti-spoofing sets read by raw-priority rules
""" + "".join(f"""\
table {family} qubes {{
  set downstream {{ type {addr}; }}
  set allowed {{ type ifname . {addr}; }}
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    iifgroup 2 goto antispoof
    {saddr} @downstream drop
  }}
  chain antispoof {{
    iifname . {saddr} @allowed accept
    drop
  }}
}}
""" for family, addr, saddr in (("ip", "ipv4_addr", "ip saddr"), ("ip6", "ipv6_addr", "ip6 saddr")))
