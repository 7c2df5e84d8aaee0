"""An OpenAI-style embeddings service over aim-mlx models (`aim-mlx serve`): /v1/embeddings for texts and
images, batched across requests. parse.py reads requests, batcher.py merges them into model batches,
models.py holds the models, app.py is the Starlette app and server.py puts it together with the photo page.
"""
