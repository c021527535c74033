import Testing
@testable import FerryWire
#if canImport(Glibc)
import Glibc
#endif

func tempDir() -> String {
    var template = Array("/tmp/ferry-keys-XXXXXX".utf8CString)
    return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
}

@Suite struct KeysTests {
    @Test func secretTextRoundTrip() throws {
        let s = try PreSharedSecret.generate()
        #expect(s.text.count == 64)
        let back = try PreSharedSecret(text: "# made by seeder secret\n\(s.text)\n")
        #expect(back.text == s.text)
        #expect(try PreSharedSecret.generate().text != s.text)
    }

    @Test func badSecretSaysWhatAndWhere() {
        #expect { try PreSharedSecret(text: "\nabc\n", path: "s.txt") } throws: { "\($0)" == "s.txt line 2: expected 64 hexadecimal digits (a 256-bit secret as printed by `seeder secret`), found 3 characters" }
        #expect { try PreSharedSecret(text: "# only a comment\n", path: "s.txt") } throws: { "\($0)".contains("no secret found") }
    }

    @Test func keyPairSaveLoadAndPermissions() throws {
        let dir = tempDir()
        defer {
            for file in ["id", "id.pub"] { unlink("\(dir)/\(file)") }
            rmdir(dir)
        }
        let kp = try KeyPair.generate()
        try kp.save(privatePath: "\(dir)/id", publicPath: "\(dir)/id.pub", comment: "seeder@host")
        var st = stat()
        #expect(stat("\(dir)/id", &st) == 0 && st.st_mode & 0o777 == 0o600)
        let loaded = try KeyPair.load(path: "\(dir)/id")
        #expect(loaded.publicKey == kp.publicKey)
        let pubText = try KeyFiles.read("\(dir)/id.pub")
        #expect(pubText.hasPrefix("ferry-ed25519 ") && pubText.hasSuffix(" seeder@host\n"))
        #expect(try PublicKey(text: pubText.trimmingCharacters()) == kp.publicKey)
        chmod("\(dir)/id", 0o644)
        #expect { try KeyPair.load(path: "\(dir)/id") } throws: { "\($0)".contains("permissions 644 are too open") && "\($0)".contains("chmod 600 \(dir)/id") }
        #expect { try KeyPair.load(path: "\(dir)/missing") } throws: { "\($0)".contains("\(dir)/missing: cannot open") }
        chmod("\(dir)/id.pub", 0o600)
        #expect { try KeyPair.load(path: "\(dir)/id.pub") } throws: { "\($0)".contains("this is a public key") }
    }

    /// Issue 11 finding 8: a link planted at FILE.pub made `keygen` truncate
    /// its target and set its mode to 644.
    @Test func keygenNeverFollowsALinkPlantedAtThePublicKeyPath() throws {
        let dir = tempDir()
        defer {
            for file in ["id", "id.pub", "victim"] { unlink("\(dir)/\(file)") }
            rmdir(dir)
        }
        let victim = "\(dir)/victim"
        try KeyFiles.write(victim, "precious\n", mode: 0o600)
        #expect(symlink(victim, "\(dir)/id.pub") == 0)
        let kp = try KeyPair.generate()
        #expect { try kp.save(privatePath: "\(dir)/id", publicPath: "\(dir)/id.pub") } throws: {
            "\($0)" == "\(dir)/id.pub: already exists; pass --force to replace it"
        }
        #expect(!KeyFiles.exists("\(dir)/id"), "nothing is written when one of the two paths is taken")
        // --force replaces the link itself and leaves its target alone.
        try kp.save(privatePath: "\(dir)/id", publicPath: "\(dir)/id.pub", replace: true)
        var st = stat()
        #expect(stat(victim, &st) == 0 && st.st_mode & 0o777 == 0o600)
        #expect(try KeyFiles.read(victim) == "precious\n")
        #expect(lstat("\(dir)/id.pub", &st) == 0 && st.st_mode & S_IFMT == S_IFREG && st.st_mode & 0o777 == 0o644)
        #expect(try KeyPair.load(path: "\(dir)/id").publicKey == kp.publicKey)
        // A dangling link at the private key path is refused too (O_EXCL).
        unlink("\(dir)/id"); unlink("\(dir)/id.pub")
        #expect(symlink("\(dir)/elsewhere", "\(dir)/id") == 0)
        #expect { try kp.save(privatePath: "\(dir)/id", publicPath: "\(dir)/id.pub") } throws: { "\($0)".contains("already exists") }
        #expect(!KeyFiles.exists("\(dir)/elsewhere") && !KeyFiles.exists("\(dir)/id.pub"))
    }

    /// Issue 11 finding 8: the secret file was checked with `stat` and then
    /// opened by path, followed links, ignored the owner, and took any bytes.
    @Test func secretFilesMustBeOursPrivateRegularAndRandom() throws {
        let dir = tempDir()
        defer {
            for file in ["secret", "link", "zero", "pattern", "fifo"] { unlink("\(dir)/\(file)") }
            rmdir(dir)
        }
        let secret = try PreSharedSecret.generate()
        try secret.save(path: "\(dir)/secret")
        #expect(try PreSharedSecret.load(path: "\(dir)/secret").text == secret.text)
        #expect { try secret.save(path: "\(dir)/secret") } throws: { "\($0)".contains("already exists") }

        #expect(symlink("\(dir)/secret", "\(dir)/link") == 0)
        #expect { try PreSharedSecret.load(path: "\(dir)/link") } throws: { "\($0)" .contains("\(dir)/link: is a symbolic link") }

        #expect(mkfifo("\(dir)/fifo", 0o600) == 0)
        #expect { try PreSharedSecret.load(path: "\(dir)/fifo") } throws: { "\($0)".contains("is not a regular file") }

        try KeyFiles.write("\(dir)/zero", String(repeating: "0", count: 64) + "\n", mode: 0o600)
        #expect { try PreSharedSecret.load(path: "\(dir)/zero") } throws: { "\($0)".contains("the secret is not random") }
        try KeyFiles.write("\(dir)/pattern", String(repeating: "0123456789abcdef", count: 4) + "\n", mode: 0o600)
        #expect { try PreSharedSecret.load(path: "\(dir)/pattern") } throws: { "\($0)".contains("the secret is not random") }
    }

    @Test(.enabled(if: geteuid() == 0, "changing a file's owner needs root"))
    func aSecretFileOwnedBySomeoneElseIsRefused() throws {
        let dir = tempDir()
        defer { unlink("\(dir)/secret"); rmdir(dir) }
        let secret = try PreSharedSecret.generate()
        try secret.save(path: "\(dir)/secret")
        #expect(chown("\(dir)/secret", 4242, 4242) == 0)
        #expect { try PreSharedSecret.load(path: "\(dir)/secret") } throws: { "\($0)".contains("is owned by uid 4242, not by us (uid 0) or root") }
    }

    @Test func authorizedKeysParsing() throws {
        let a = try KeyPair.generate().publicKey, b = try KeyPair.generate().publicKey
        let keys = try AuthorizedKeys(text: "# leechers\n\n\(a.text) laptop\n  \(b.text)\n", path: "auth")
        #expect(keys.keys == [a, b])
        #expect(keys.contains(a) && keys.contains(b))
        #expect { try AuthorizedKeys(text: "\(a.text)\nssh-ed25519 AAAA x\n", path: "auth") } throws: {
            "\($0)" == "auth line 2: unknown key type 'ssh-ed25519' (expected ferry-ed25519; create keys with `seeder keygen` or `leecher keygen`)"
        }
        #expect { try AuthorizedKeys(text: "ferry-ed25519 !!!\n", path: "auth") } throws: { "\($0)".contains("auth line 1: the key is not valid base64") }
    }
}

extension String {
    func trimmingCharacters() -> String { String(Substring(self).trimmingWhitespace.split(separator: "\n").first ?? "") }
}
