"""DVC stage `prepare`: Fashion-MNIST → data/prepared/{train,val,test}/<class>/*.png."""

from _params import ROOT, load_params

from featurestore.prepare import prepare_fashion_mnist

if __name__ == "__main__":
    p = load_params("prepare")
    counts = prepare_fashion_mnist(
        ROOT / "data" / "prepared",
        labels_per_class=p["labels_per_class"],
        val_per_class=p["val_per_class"],
        test_per_class=p["test_per_class"],
        seed=p["seed"],
        source=p["source"],
    )
    print(f"prepared {counts.train} train, {counts.val} val, {counts.test} test images")
