"""Secure aggregation, mask then encrypt: no coalition of the server and one bank reads another bank's update.

Banks add pairwise and self masks (Bonawitz et al., CCS 2017; k-regular neighbourhoods after Bell
et al., CCS 2020) to their fixed-point update modulo the BFV plaintext modulus t, then encrypt it
with the job's BFV public key. The server adds the ciphertexts, reconstructs from Shamir shares
only the masks that do not cancel (survivors' self masks, dropped banks' pairwise masks) and
subtracts them; banks decrypt only the unmasked sum. A bank's individual ciphertext decrypts, even
with the BFV secret key, to residues uniform modulo t.

Modules (import the side you are; this package imports neither):
  fedmoe.crypto.secagg.bank        BankSecAgg (stages), open_aggregate        - bank only
  fedmoe.crypto.secagg.bfv_secret  bfv_keygen, load_bfv_secret, decryption    - bank only
  fedmoe.crypto.secagg.ceremony    BFV secret key sent bank to bank, sealed    - bank only
  fedmoe.crypto.secagg.server      ServerSecAgg (stages)                      - server; imports no secret code
  fedmoe.crypto.secagg.bfv         public BFV context, encryption, bundles     - both
  fedmoe.crypto.secagg.messages    typed messages (bytes / JSON)                - both
  fedmoe.crypto.secagg.params      SecAggParams, thresholds, neighbourhoods    - both
See docs/secagg.md.
"""
