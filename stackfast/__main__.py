from stackfast.cli import main

raise SystemExit(main())
