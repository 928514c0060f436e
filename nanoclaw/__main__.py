from nanoclaw.cli.main import main

raise SystemExit(main())
