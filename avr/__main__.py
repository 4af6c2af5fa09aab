from avr.cli import main

main()
