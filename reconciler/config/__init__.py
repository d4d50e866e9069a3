"""The desired-state file: YAML with line marks → schema → semantic rules → a frozen ``Desired``;
comment-keeping edits of it, and which git commit it comes from. Reads and writes the file only."""
