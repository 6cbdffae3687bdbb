"""Storage every node reaches: checkpoints of training runs (``run_storage``) and the published prepared
dataset (``dataset_access``), on a local folder, a shared mount or an object store (``s3://``)."""
