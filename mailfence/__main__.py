from mailfence.cli import main

if __name__ == "__main__":  # the delivery process is spawned; it must not run the CLI again
    main()
