from keter.cli import main

raise SystemExit(main())
