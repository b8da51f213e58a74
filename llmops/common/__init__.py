"""What every part shares: errors, atomic I/O, stage results, the stage table and its runner, tracking, fingerprints, environment switches."""
