"""`ngdiff study`: a grid of unlearning runs on one world (spec, world, runner, results, plots, report)."""
