"""`python -m agent_runner`: configure logging, load the config, run the poll loop."""

from agent_runner.main import main

raise SystemExit(main())
