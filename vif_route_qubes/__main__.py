from vif_route_qubes.cli import main

main()
