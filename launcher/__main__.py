from launcher.cli import entry

raise SystemExit(entry())
