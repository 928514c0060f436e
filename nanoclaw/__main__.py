from nanoclaw.cli import main

raise SystemExit(main())
