"""What ramcli remembers: the SQLite index, the write ledger, search and write-back."""
