from regtok.cli import main

main()
