"""`python -m fedsb` = the `fedsb` command."""

from fedsb.cli import console_main

console_main()
