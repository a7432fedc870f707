from critique_local.cli import main

main()
