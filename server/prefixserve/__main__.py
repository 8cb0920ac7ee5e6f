from prefixserve.cli import main

main()
