from benchmarks.scenarios import main

raise SystemExit(main())
