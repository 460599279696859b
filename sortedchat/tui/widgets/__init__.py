"""The chat app's widgets: the conversation, answers in depth colours, the layer lens, the status line."""
