r"""How fast can the miniature's image tower learn the shapes world's categories with labels?

  python benchmarks/shape_learnability.py --model=vit --steps=600

Trains an image model from scratch on single-object shapes-world scenes (fresh scenes every step,
so there is no overfitting) with plain 32-way softmax supervision, and prints the loss and the
top-1 accuracy on 500 held-out scenes every 100 steps. This is an upper bound on what image-text
pretraining of the same tower can learn about the categories in as many steps: a caption is
weaker supervision than a label. `--model=cnn` is a 3-layer convolutional network for comparison;
`--size_range` and `--upright` change the objects' sizes and let silhouettes only tilt.
(The benchmark chose the world's design: a tower that stays near chance here cannot be expected
to learn the categories from captions in the pipeline's budget.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("vit", "cnn"), default="vit")
    parser.add_argument("--variant", default="pico/8", help="ViT variant (the shapes recipe's)")
    parser.add_argument("--image_size", type=int, default=64, help="pretraining resolution")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size_range", type=float, nargs=2, default=None)
    parser.add_argument("--upright", action="store_true", help="every shape only tilts a little")
    args = parser.parse_args()

    import flax.linen as nn
    import jax
    import optax

    from rovit_jax.data import shapes_world as sw
    from rovit_jax.data.image_text import resize_image
    from rovit_jax.models.vit import ViT, vit_variant

    if args.size_range:
        sw.SIZE_RANGE = tuple(args.size_range)
    if args.upright:
        sw._SHAPE_PARTS = {k: (parts, True) for k, (parts, _) in sw._SHAPE_PARTS.items()}
    rng = np.random.default_rng(0)
    num_classes = len(sw.CATEGORIES)

    def batch(n):
        images, labels = [], []
        for _ in range(n):
            scene = sw.render_scene(rng, 128, max_objects=1)
            small = resize_image(scene["image"], args.image_size).astype(np.float32)
            images.append(small / 127.5 - 1)
            labels.append(scene["labels"][0])
        return np.stack(images), np.array(labels)

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x):
            if args.model == "cnn":
                for c in (32, 64, 96):
                    x = nn.relu(nn.Conv(c, (3, 3), strides=2)(x))
                z = x.mean((1, 2))
            else:
                vit = vit_variant(args.variant)
                g = args.image_size // vit["patch_size"]
                z, _ = ViT(**vit, posemb_grid=(g, g), pool_type="gap")(x)
            return nn.Dense(num_classes)(z)

    model = Classifier()
    params = model.init(jax.random.PRNGKey(0), batch(2)[0])
    tx = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, args.lr, 50, args.steps), weight_decay=1e-4
    )
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    predict = jax.jit(lambda p, x: model.apply(p, x).argmax(-1))
    x_test, y_test = batch(500)
    start = time.time()
    print(
        f"{args.model} {args.variant if args.model == 'vit' else ''} at {args.image_size} px; "
        f"chance {1 / num_classes:.3f}"
    )
    for i in range(args.steps):
        params, opt, loss = step(params, opt, *batch(args.batch))
        if (i + 1) % 100 == 0 or i + 1 == args.steps:
            acc = float(np.mean(np.asarray(predict(params, x_test)) == y_test))
            print(
                f"step {i + 1}: loss {float(loss):.3f}, held-out top-1 {acc:.3f} "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
