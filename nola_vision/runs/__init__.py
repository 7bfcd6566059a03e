"""Running experiments: the results store, executors (local, SLURM via submitit), the paper's protocol, the k-NN
baseline and hyperparameter tuning. Every run is a ``nola-vision fit`` process; nothing here imports the console
script."""
