"""DVC stage `prepare`: Fashion-MNIST → OUT/{train,val,test}/<class>/*.png."""

from _params import load_params, stage_arguments

from featurestore.data.prepare import prepare_fashion_mnist

if __name__ == "__main__":
    args = stage_arguments(__doc__, (), {"out": "the prepared data set (replaced)"})
    p = load_params("prepare")
    counts = prepare_fashion_mnist(args.out, labels_per_class=p["labels_per_class"], val_per_class=p["val_per_class"],
                                   test_per_class=p["test_per_class"], seed=p["seed"], source=p["source"])
    print(f"prepared {counts.train} train, {counts.val} val, {counts.test} test images")
