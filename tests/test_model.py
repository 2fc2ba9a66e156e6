"""model.py: gradient reversal, the lambda schedule, encoders, losses, one training step."""
import math
import urllib.error

import pytest
import torch
import torchvision

import model as M


def test_gradient_reversal_is_identity_forward_and_scales_gradient_by_minus_lambda():
    x = torch.randn(5, 7, requires_grad=True)
    y = M.GradientReversal.apply(x, 0.37)
    assert torch.equal(y, x)
    w = torch.randn(5, 7)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.37 * w)


@pytest.mark.parametrize("lambd", [0.0, 0.5, 1.0])
def test_domain_classifier_reverses_the_gradient_reaching_the_embedding(lambd):
    torch.manual_seed(0)
    clf = M.DomainClassifier(8)
    emb = torch.randn(4, 8, requires_grad=True)
    clf(emb, lambd).sum().backward()
    reversed_grad = emb.grad.clone()
    emb.grad = None
    clf.mlp(emb).sum().backward()  # the same classifier without the reversal layer
    torch.testing.assert_close(reversed_grad, -lambd * emb.grad)


def test_grl_lambda_schedule():
    total, start = 1000, 200
    assert M.grl_lambda(0, total, start) == 0.0
    assert M.grl_lambda(199, total, start) == 0.0
    assert M.grl_lambda(200, total, start) == 0.0  # p = 0
    mid = M.grl_lambda(600, total, start)          # p = 0.5
    assert mid == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert M.grl_lambda(1000, total, start) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert M.grl_lambda(5000, total, start) == M.grl_lambda(1000, total, start)  # p clipped at 1
    values = [M.grl_lambda(s, total, start) for s in range(0, 1001, 10)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert M.grl_lambda(10, 100, 100) == 0.0  # threshold at or after the end: never reversed


@pytest.mark.parametrize("backbone", sorted(M.BACKBONES))
def test_encoder_gives_unit_embeddings(backbone):
    torch.manual_seed(0)
    size = 64 if backbone in M.PATCH_SIZE else 32  # a vision transformer's side: a multiple of its patch
    enc = M.Encoder(backbone, embedding_dim=12, pretrained=False, image_size=size).eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, size, size))
    assert out.shape == (2, 12)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_unknown_backbone_is_rejected():
    with pytest.raises(M.ModelConfigError, match="unknown backbone 'alexnet9'"):
        M.ZSSBIRModel("alexnet9", 8, pretrained=False)


def test_missing_pretrained_weights_give_one_actionable_line(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(M.PretrainedWeightsUnavailable) as err:
        M.build_trunk("resnet18", True)  # ask for ImageNet weights
    msg = str(err.value)
    assert "\n" not in msg and "--no-pretrained" in msg and "resnet18-f37072fd.pth" in msg
    assert torch.hub.get_dir() in msg


def test_losses_triplet_and_balanced_domain_terms():
    torch.manual_seed(0)
    net = M.ZSSBIRModel("resnet18", 16, pretrained=False)
    x = torch.randn(3, 3, 32, 32)
    out = M.sbir_losses(net, M.Triplets(x, x.clone(), torch.randn(3, 3, 32, 32)), lambd=0.0, margin=0.2)
    assert set(out) == {"triplet", "domain", "domain_acc", "domain_logit"}
    assert out["triplet"].item() >= 0 and math.isfinite(out["domain"].item())
    assert 0.0 <= out["domain_acc"].item() <= 1.0
    # a huge margin makes every triplet active: loss = margin + d(s, p) - d(s, n)
    big = M.sbir_losses(net.eval(), M.Triplets(x, x, x), lambd=0.0, margin=5.0)
    assert big["triplet"].item() == pytest.approx(5.0, abs=1e-4)


def test_losses_under_cpu_autocast_are_finite_float32():
    torch.manual_seed(0)
    net = M.ZSSBIRModel("resnet18", 16, pretrained=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = M.sbir_losses(net, M.Triplets(x, x, x), lambd=0.5, margin=0.2)
    assert out["domain"].dtype == torch.float32 and torch.isfinite(out["domain"])


def test_one_training_step_updates_every_part_and_reverses_domain_gradient():
    torch.manual_seed(0)
    net = M.ZSSBIRModel("resnet18", 16, pretrained=False)
    s, p, n = (torch.randn(4, 3, 32, 32) for _ in range(3))

    def encoder_grad_from_domain(lambd):
        net.eval()  # no dropout: the three passes see the same network
        net.zero_grad()
        M.sbir_losses(net, M.Triplets(s, p, n), lambd=lambd, margin=0.2)["domain"].backward()
        return net.sketch_encoder.head[1].weight.grad.clone(), net.domain_classifier.mlp[0].weight.grad.clone()

    g0, c0 = encoder_grad_from_domain(0.0)
    g1, c1 = encoder_grad_from_domain(1.0)
    g2, c2 = encoder_grad_from_domain(2.0)
    assert torch.count_nonzero(g0) == 0            # lambda 0: the domain loss does not move the encoder
    torch.testing.assert_close(g2, 2 * g1)         # the encoder's domain gradient scales with lambda
    torch.testing.assert_close(c1, c0)             # the classifier's own gradient does not depend on lambda
    assert torch.count_nonzero(c0) > 0

    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt.zero_grad()
    out = M.sbir_losses(net, M.Triplets(s, p, n), lambd=0.5, margin=0.2)
    (out["triplet"] + 0.5 * out["domain"]).backward()
    opt.step()
    after = net.state_dict()
    for part in ("sketch_encoder.head.1.weight", "photo_encoder.head.1.weight", "domain_classifier.mlp.0.weight",
                 "sketch_encoder.trunk.0.weight", "photo_encoder.trunk.0.weight"):
        assert not torch.equal(before[part], after[part]), part


def test_class_loss_uses_shared_proxies_for_both_domains():
    torch.manual_seed(0)
    plain = M.ZSSBIRModel("resnet18", 16, pretrained=False)
    torch.manual_seed(0)
    net = M.ZSSBIRModel("resnet18", 16, pretrained=False, num_classes=5).eval()
    # proxies are created last: the encoders start exactly as without them
    for key, value in plain.state_dict().items():
        assert torch.equal(value, net.state_dict()[key]), key
    x = torch.randn(2, 3, 32, 32)
    labels, neg_labels = torch.tensor([0, 3]), torch.tensor([1, 4])
    assert "class" not in M.sbir_losses(plain, M.Triplets(x, x, x, labels, neg_labels), 0.0, 0.2)
    out = M.sbir_losses(net, M.Triplets(x, x, x, labels, neg_labels), 0.0, 0.2)
    s, ph = net.sketch_encoder(x), net.photo_encoder(torch.cat([x, x]))
    logits = torch.cat([s, ph]) @ torch.nn.functional.normalize(net.class_proxies.weight, dim=1).t() / 0.1
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 0, 3, 1, 4]))
    torch.testing.assert_close(out["class"], expected)
    out["class"].backward()
    assert net.class_proxies.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------- one shared trunk

def test_a_shared_trunk_is_saved_once_and_both_views_use_it():
    torch.manual_seed(0)
    net = M.ZSSBIRModel("resnet18", 16, pretrained=False, num_classes=3, shared_trunk=True).eval()
    names = [n for n, _ in net.named_children()]
    assert names == ["encoder", "domain_classifier", "class_proxies"]
    assert not any(k.startswith(("sketch_encoder", "photo_encoder")) for k in net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net.sketch_encoder(x), net.photo_encoder(x), rtol=0, atol=0)  # one network
    net.sketch_encoder.train()
    assert net.encoder.training and net.photo_encoder.training  # the views are the encoder's


def test_domain_batch_norm_keeps_statistics_per_domain():
    torch.manual_seed(0)
    net = M.ZSSBIRModel("resnet18", 16, pretrained=False, shared_trunk=True, domain_bn=True).train()
    dbns = [m for m in net.modules() if isinstance(m, M.DomainBatchNorm2d)]
    assert dbns and not any(isinstance(m, torch.nn.BatchNorm2d) and not isinstance(p, M.DomainBatchNorm2d)
                            for p in net.modules() for m in p.children() if p is net.encoder.trunk)
    net.sketch_encoder(torch.randn(4, 3, 32, 32))            # moves only the sketch statistics
    first = dbns[0]
    assert not torch.equal(first.bns[0].running_mean, torch.zeros_like(first.bns[0].running_mean))
    assert torch.equal(first.bns[1].running_mean, torch.zeros_like(first.bns[1].running_mean))
    with pytest.raises(M.ModelConfigError, match="shared_trunk"):
        M.ZSSBIRModel("resnet18", 16, pretrained=False, domain_bn=True)


def test_embed_pair_of_a_shared_trunk_normalises_the_mixed_batch():
    """Without domain batch norm one batch holds both domains: train-mode embeddings equal those of the
    concatenated batch, not of each domain alone."""
    torch.manual_seed(0)
    net = M.ZSSBIRModel("resnet18", 16, pretrained=False, shared_trunk=True).train()
    net.encoder.head[0].p = 0.0  # no dropout: compare the arithmetic only
    s, p = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32) + 1
    es, ep, _, _ = net.embed_pair(s, p)
    both = net.encoder(torch.cat([s, p]))
    torch.testing.assert_close(torch.cat([es, ep]), both, rtol=0, atol=0)


def test_hardest_negative_triplet_matches_a_loop():
    torch.manual_seed(0)
    s = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    p = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    terms = []
    for i in range(6):
        neg = min((s[i] - p[j]).norm().item() for j in range(6) if labels[j] != labels[i])
        terms.append(max(0.0, 0.3 + (s[i] - p[i]).norm().item() - neg))
    assert M.hardest_negative_triplet(s, p, labels, 0.3).item() == pytest.approx(sum(terms) / 6, rel=1e-5)
    assert M.hardest_negative_triplet(s, p, torch.zeros(6, dtype=torch.long), 0.3).item() == 0.0  # no negative


def test_domain_loss_weights_domains_equally_and_smooths_targets():
    logits = torch.tensor([-2.0, 1.0, 3.0, 0.5, -1.0])  # 2 sketches, 3 photos
    loss, acc = M.domain_loss(logits, 2, smoothing=0.2)

    def bce(x, t):
        return -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))

    sketch = sum(bce(x, 0.1) for x in (-2.0, 1.0)) / 2
    photo = sum(bce(x, 0.9) for x in (3.0, 0.5, -1.0)) / 3
    assert loss.item() == pytest.approx(0.5 * (sketch + photo), rel=1e-6)
    assert acc.item() == pytest.approx(0.5 * (1 / 2 + 2 / 3))


def test_paired_losses_learn_on_a_shared_trunk_with_features_for_the_domain_classifier():
    torch.manual_seed(0)
    net = M.ZSSBIRModel("resnet18", 16, pretrained=False, num_classes=3, shared_trunk=True, domain_input="features")
    assert net.domain_classifier.mlp[0].in_features == 512  # resnet18's pooled features
    s, p = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    first = None
    for _ in range(5):
        out = M.sbir_losses(net, M.Pairs(s, p, labels), lambd=0.0, margin=0.2)
        loss = out["class"] + out["triplet"] + out["domain"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(out) == {"class", "triplet", "domain", "domain_acc", "domain_logit"} and loss.item() < first


def test_triplets_give_the_domain_classifier_trunk_features_when_it_reads_features():
    """domain_input "features" with triplets, on a trunk wider than the embedding (resnet18: 512 features, a
    16-d embedding): the domain classifier, built for the features, reads the features of the sketches and of
    both photos, as it does for pairs."""
    torch.manual_seed(0)
    net = M.ZSSBIRModel("resnet18", 16, pretrained=False, num_classes=3, domain_input="features").eval()
    assert net.domain_classifier.mlp[0].in_features == 512
    s, p, n = (torch.randn(2, 3, 32, 32) for _ in range(3))
    out = M.sbir_losses(net, M.Triplets(s, p, n, torch.tensor([0, 1]), torch.tensor([2, 0])), lambd=0.5, margin=0.2)
    _, fs = net.sketch_encoder(s, with_features=True)
    _, fp = net.photo_encoder(torch.cat([p, n]), with_features=True)
    logits = net.domain_classifier(torch.cat([fs, fp]), 0.5)  # (6,): 2 sketches, 4 photos
    torch.testing.assert_close(out["domain"], M.domain_loss(logits, 2)[0])
    assert set(out) == {"class", "triplet", "domain", "domain_acc", "domain_logit"}
