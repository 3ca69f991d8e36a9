from dgprune.cli import main

main()
