from dsbuild.cli import main

main()
