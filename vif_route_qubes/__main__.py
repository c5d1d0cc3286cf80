from vif_route_qubes.cli.main import main

main()
