"""The application, at the top of the house: the CLI, the embedded stack and the Temporal client helpers.
It may import every layer below it; nothing imports it."""
