"""AWS EC2 and EBS: source (instance volumes via CreateSnapshots + EBS direct reads) and target (EBS
snapshots written with the EBS direct APIs)."""
