from headshot_kit.cli import main

raise SystemExit(main())
