"""Text from outside, as it may reach a terminal.

An issuer's `email`, its device `user_code` and `verification_uri`, an authorization URL, a
profile name read from a file — any of it can carry escape sequences that set the window title,
erase a line or (OSC 52) write the clipboard. Whatever iapctl (or iapd, in its messages) prints
of it goes through `shown` first: control characters become visible escapes, line by line.
"""


def shown(text: object, keep_lines: bool = False) -> str:
    """`text` with every control character escaped (`keep_lines`: but for the line breaks of a
    message of several lines that is ours)."""
    text = str(text)
    if text.isprintable():
        return text
    if keep_lines:
        return "\n".join(shown(line) for line in text.split("\n"))
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
