from llmbalancer.cli import main

raise SystemExit(main())
