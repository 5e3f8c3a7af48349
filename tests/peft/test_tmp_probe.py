import peft
def test_x():
    print(peft.__file__)
    import surm
    assert hasattr(peft, "get_peft_model"), peft.__file__
