from qi.cli import main

main()
