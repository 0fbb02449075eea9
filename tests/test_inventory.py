"""The route interface and the inventory: every route answers the same questions, read back as people read them."""

import keras
import pytest

from keras_l2 import L2Route, l2_routes, select_layers
from keras_l2.inventory import describe, penalty_terms
from tests.helpers import ROUTES, compile_route, mlp

pytestmark = pytest.mark.core

KIND = {"regularizer": "regularizer", "loss": "loss", "coupled": "optimizer", "decoupled": "optimizer"}
MODE = {"regularizer": "penalty", "loss": "penalty", "coupled": "coupled", "decoupled": "decoupled"}


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_answers_the_interface(route):
    model = mlp()
    chosen = select_layers(model, names="hidden")
    compile_route(model, route, keras.optimizers.SGD(0.1), 0.25, 8, chosen)
    (found,) = l2_routes(model).routes
    assert isinstance(found, L2Route)
    assert (found.kind, found.mode, found.l2, found.n) == (KIND[route], MODE[route], 0.25, 8)
    assert found.in_loss == (KIND[route] != "optimizer")
    assert [id(k) for k in found.kernels(model)] == [id(model.get_layer("hidden").kernel)]
    assert found.covers(model.get_layer("hidden").kernel) and not found.covers(model.get_layer("out").kernel)
    assert [([id(k) for k in kernels], l2, n, in_loss) for kernels, l2, n, in_loss in penalty_terms(model)] == [
        ([id(model.get_layer("hidden").kernel)], 0.25, 8, found.in_loss)]


@pytest.mark.parametrize("route", ROUTES)
def test_the_description_names_route_mode_lambda_and_kernels(route):
    model = mlp()
    compile_route(model, route, keras.optimizers.SGD(0.1), 0.5, 4, select_layers(model))
    description = describe(model)
    assert (description.route, description.mode, description.l2, description.ns) == (
        KIND[route], MODE[route], 0.5, (4,))
    assert description.chosen_kernel_ids == {id(model.get_layer(name).kernel) for name in ("hidden", "out")}


def test_a_model_without_a_route_is_described_as_none():
    model = mlp()
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    description = describe(model)
    assert (description.route, description.mode, description.l2, description.ns) == ("none", "none", None, (1,))
    assert repr(l2_routes(model)) == "L2Routes(none)"


@pytest.mark.parametrize("route", ROUTES)
def test_routes_print_kind_mode_lambda_n_and_layers(route):
    model = mlp()
    compile_route(model, route, keras.optimizers.Adam(1e-3), 0.001, 100, select_layers(model, names="hidden"))
    text = repr(l2_routes(model))
    assert " at 0x" not in text, text
    assert "l2=0.001" in text and "n=100" in text and "hidden" in text and "'out'" not in text, text
    if KIND[route] == "optimizer":
        assert f"mode={route!r}" in text and "Adam" in text, text
