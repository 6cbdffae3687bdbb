"""Ray: how a stage starts or joins a cluster (``ray_env``), stops the local processes it left
(``local_ray``), runs DDP training (``ray_train``, ``train_callbacks``) and Tune trials (``tune_trial``).
Code here runs on the driver and, shipped by ``runtime_env``, on every node's workers."""
