from provider.cli import main

main()
