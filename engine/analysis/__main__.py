from engine.analysis import main

main()
