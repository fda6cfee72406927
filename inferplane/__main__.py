from inferplane.cli import main

main()
