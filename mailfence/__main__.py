from mailfence.cli import main

main()
