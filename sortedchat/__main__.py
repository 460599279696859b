from sortedchat.cli import main

main()
