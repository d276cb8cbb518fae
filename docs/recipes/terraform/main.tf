# Linked clones with Terraform and the dmacvicar/libvirt provider (0.9 and later), two ways.
# docs/recipes/terraform/README.md says what each does and what virt-clone-cow's hook adds.
# Not run by this project's tests (the provider cannot be installed on its machines): the XML
# it sends is, through virsh, in tests/recipes.rs.

terraform {
  required_providers {
    libvirt = {
      source  = "dmacvicar/libvirt"
      version = ">= 0.9.0"
    }
  }
}

provider "libvirt" {
  uri = "qemu:///system"
}

variable "master" {
  description = "The master image, in a storage pool's directory (or in the hook's allowed_dirs)"
  type        = string
  default     = "/var/lib/libvirt/images/debian-12.qcow2"
}

variable "master_format" {
  type    = string
  default = "qcow2"
}

variable "master_pool" {
  description = "The storage pool the master belongs in: pool-helper fetches a missing master into it"
  type        = string
  default     = "default"
}

variable "master_manifest" {
  description = "A pool-helper manifest of the master, for hosts that may lack it (empty: the master is on every host)"
  type        = string
  default     = ""
}

locals {
  images = dirname(var.master)
}

# Way 1, the hook's: the domain's disk names its master in a backing store, and no volume resource
# exists. `terraform apply` only defines and starts the domain; at the start the hook makes the
# overlay (fetching a missing master first when the metadata names a manifest).
resource "libvirt_domain" "web" {
  count       = 2
  name        = "web-${count.index}"
  memory      = 1024
  memory_unit = "MiB"
  vcpu        = 1
  type        = "kvm"
  running     = true

  os = {
    type         = "hvm"
    type_arch    = "x86_64"
    boot_devices = ["hd"]
  }

  # Optional: what pool-helper needs to fetch a master this host lacks (docs/metadata.md).
  metadata = var.master_manifest == "" ? null : {
    xml = <<-XML
      <vcc:cow xmlns:vcc="urn:virt-clone-cow:1" version="1">
        <vcc:clone original="${basename(var.master)}" disposable="no">
          <vcc:disk target="vda" overlay="${local.images}/web-${count.index}.qcow2">
            <vcc:master path="${var.master}" format="${var.master_format}"
                      pool="${var.master_pool}" manifest="${var.master_manifest}"/>
          </vcc:disk>
        </vcc:clone>
      </vcc:cow>
    XML
  }

  devices = {
    disks = [
      {
        device = "disk"
        driver = { name = "qemu", type = "qcow2" }
        # Need not exist: the hook makes it at the first start and keeps it afterwards.
        source = { file = { file = "${local.images}/web-${count.index}.qcow2" } }
        backing_store = {
          format = { type = var.master_format } # always state it
          source = { file = { file = var.master } }
        }
        target = { dev = "vda", bus = "virtio" }
      }
    ]
    interfaces = [
      {
        model  = { type = "virtio" }
        source = { network = { network = "default" } }
      }
    ]
  }
}

# Way 2, the provider's: a volume over the master (the legacy 0.8 provider spells it
# `base_volume_id`). libvirt makes the overlay at `terraform apply`, so the master must already be
# on the host then; the hook has nothing to do for this domain and leaves it alone.
resource "libvirt_volume" "db" {
  name     = "db-0.qcow2"
  pool     = "default"
  capacity = 10737418240 # bytes: the master's virtual size, or more for a larger disk
  target = {
    format = { type = "qcow2" }
  }
  backing_store = {
    path   = var.master
    format = { type = var.master_format }
  }
}

resource "libvirt_domain" "db" {
  name        = "db-0"
  memory      = 1024
  memory_unit = "MiB"
  vcpu        = 1
  type        = "kvm"
  running     = true

  os = {
    type         = "hvm"
    type_arch    = "x86_64"
    boot_devices = ["hd"]
  }

  devices = {
    disks = [
      {
        device = "disk"
        driver = { name = "qemu", type = "qcow2" }
        source = { volume = { pool = libvirt_volume.db.pool, volume = libvirt_volume.db.name } }
        target = { dev = "vda", bus = "virtio" }
      }
    ]
  }
}
