"""The console scripts: thin Hydra (or argparse) entry points, each around one job function."""
