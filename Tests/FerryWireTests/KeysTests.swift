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
