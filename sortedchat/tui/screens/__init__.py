"""The app's screens: loading, the chat itself, and the help, settings and saved-chats dialogs."""
