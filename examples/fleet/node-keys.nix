# Node public keys, printed by `roost-agent key` on each node (examples, not real keys).
{
  laptop-alice = "laptop-alice:5xX2hbU6Z2kVqGQmT9QGGg0wzV7f9r0p2Qf1ZC9yq8Q=";
  laptop-bob = "laptop-bob:K3m3k2Zt3j0b0O8e0A7Z3yX0vQGd2v9m8L1q7m0b0n4=";
  pi-kitchen = "pi-kitchen:wqQ8Q2b8m9Yx5u3zY1g0Zb7w2a8d7s6f5g4h3j2k1l0=";
  pi-garage = "pi-garage:Zx9c8v7b6n5m4a3s2d1f0g9h8j7k6l5q4w3e2r1t0y8=";
}
