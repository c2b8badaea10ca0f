"""Past one machine: batch jobs (`python -m cldm batch`, in-process or on Ray Data) and serving on Ray Serve.

`jobs` reads a jobs file into Job records, `render` turns one Job into pictures (the only code that makes a batch
picture, wherever it runs), `batch` runs a job list in-process with its output folder and manifest, `ray_batch` runs
the same list as a Ray Data pipeline and `serve` puts the model manager behind a Ray Serve deployment. Ray is
imported only by the last two, and only when asked for (`pip install -r requirements-scale.txt`).
"""
