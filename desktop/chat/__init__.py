"""The chat page's parts: history panel, transcript, message blocks, Markdown, citations.

``desktop.pages.chat.ChatPage`` puts them together and runs the chat calls.
"""
