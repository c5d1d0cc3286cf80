from setup_dnat_to_ns.cli import main

main()
