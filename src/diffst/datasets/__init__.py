"""Built-in datasets: seeded synthetic tissues in the layouts of spatialdata-io, and small public real datasets."""
