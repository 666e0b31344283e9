from mpproxy.cli import main

raise SystemExit(main())
